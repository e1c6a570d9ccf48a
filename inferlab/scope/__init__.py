"""The oscilloscope: a live web dashboard of the engine (`/scope` on `inferlab serve`) and recorded
timelines (`--record`, `inferlab scope --replay`), both fed by the engine's detailed snapshot."""
