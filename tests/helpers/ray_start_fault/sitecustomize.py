"""Fault injection for tests: the first ``CAPFILT_TEST_RAY_START_FAILURES`` calls of ``ray.init`` in
this process fail as a local Ray start-up that timed out (Ray's own message), after really
starting and then abandoning the call, as a busy machine makes it happen. Put this folder on
``PYTHONPATH`` of a ``capfilt`` subprocess; nothing in capfilt knows about it."""

import os

_left = int(os.environ.get("CAPFILT_TEST_RAY_START_FAILURES", "0"))

if _left:
    import ray

    _real_init = ray.init

    def _init(*args, **kwargs):
        global _left
        if _left > 0:
            _left -= 1
            raise Exception("The current node timed out during startup. This could happen because some of the "
                            "raylet failed to startup or the GCS has become overloaded.")
        return _real_init(*args, **kwargs)

    ray.init = _init
