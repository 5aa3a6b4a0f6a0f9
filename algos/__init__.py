"""Algorithms on top of flowgym: advantage estimators, loss modules (PPO-clip, Flow-GRPO, Flow-CPS,
Flow-DPPO, GRPO-Guard), the trainer and the hydra entry point (``python -m algos.run algo=flow_dppo``)."""
