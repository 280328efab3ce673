"""tree_parallel: CatBoost / LightGBM / XGBoost Optuna trials in parallel worker processes.

Each worker is a fresh interpreter pinned to one GPU (CUDA_VISIBLE_DEVICES set before it starts) or
to a share of the CPU cores. Up to ``xgboost_per_gpu`` workers share a GPU, for XGBoost trials only;
the pool holds each GPU's lease for its workers while GPU trials run there. Modules:

- ``libraries``  how each tree library trains one fold (datasets built once, early stopping, R^2)
- ``trial``      one trial: k-fold CV over a job, the per-process fold cache, and the one-trial CLI
- ``placement``  which GPU and which CPU cores each worker gets
- ``worker``     the worker process: its JSON-lines protocol (schemas/tree_worker_protocol.schema.json)
                 and its main loop
- ``slots``      the pool's worker processes (child_process.ChildProcess), one slot per placement
- ``scheduling`` which trial a free worker takes
- ``leases``     the GPU leases the pool holds for its workers
- ``retry``      what a worker's death costs its trial
- ``pool``       TreeTrialPool: the façade, a batch's loop over the workers' events
- ``executor``   TreeParallelExecutor: the ``tree_parallel`` executor the host loads

Importing this package (or any module here) imports no tree library and never torch.
"""
