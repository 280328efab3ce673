"""nn_batch: many SurvivorQualityNet trials trained at once per GPU, by a persistent worker process.

Host side (no torch): ``executor`` (the Executor), ``client`` (one worker process), ``protocol`` (the
JSON-lines requests and replies). Worker side (torch): ``worker`` (the process), ``model`` and
``training`` (what one model fit means, defined once), the trainers ``serial``, ``streams`` and
``fused``, ``budget`` (VRAM sizing), ``oom`` (OOM recovery), ``device_data`` (datasets on the device).
"""
