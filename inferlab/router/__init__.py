"""The router: an OpenAI-compatible proxy in front of several `inferlab serve` instances
(`app.py`), choosing one per request by a routing policy shared with the simulator
(`policy.py`), or in P/D mode sending each prompt to a prefill instance, then to a decode one."""
