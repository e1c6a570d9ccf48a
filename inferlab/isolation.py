"""A failed step confined to the requests that cause it: the batch is run again one request at a time,
so a request that breaks the model or the sampler fails alone and the others carry on (their K/V
slots are simply written again). A dead tensor-parallel rank is not isolated: no step can run."""
from __future__ import annotations

import logging

from inferlab.distributed import EngineDeadError
from inferlab.request import Request

log = logging.getLogger("inferlab")


def execute_isolating(runner, scheduled: list[tuple[Request, int]]) -> tuple[dict, list[tuple[Request, str]]]:
    """`runner.execute(scheduled)`'s results, and (request, error) for each request that failed alone."""
    try:
        return runner.execute(scheduled), []
    except EngineDeadError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is isolated, then reported per request
        log.warning("a step of %d requests failed (%s: %s); retrying them one by one",
                    len(scheduled), type(e).__name__, e)
    results, failed = {}, []
    for item in scheduled:
        try:
            results.update(runner.execute([item]))
        except EngineDeadError:
            raise
        except Exception as e:  # noqa: BLE001
            log.error("request %s failed: %s: %s", item[0].request_id, type(e).__name__, e)
            failed.append((item[0], f"{type(e).__name__}: {e}"))
    return results, failed
