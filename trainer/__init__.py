"""tunefleet's worker side: the Optuna worker process and the default objective.

Shipped to GPU hosts on its own, so it never imports the operator's ``ops`` package.
Run a worker with ``python -m trainer.worker --study NAME``.
"""
