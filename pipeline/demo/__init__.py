"""The built-in demo: a tiny base model and LoRA adapters for synthetic tasks, built offline from a seed.

``build_demo(root, cfg)`` writes, from ``DemoConfig.seed`` alone and with nothing downloaded:

- ``root/data/<task>/{train,valid,test}.jsonl``: mlx-lm prompt/completion sets (``tasks``),
- ``root/models/base/``: a tiny llama (``tinymodel``) pretrained to copy words (``pretrain``),
- ``root/adapters/<task>/``: one mlx-lm LoRA adapter per task, trained with mlx-lm's trainer
  (``train``); ``mlx_lm.load(base, adapter_path=...)`` loads each one unchanged.

Tasks: ``up abcd -> ABCD``, ``inc 1234 -> 2345``, ``sh !#$% -> #$%&``. Each adapter scores 100% exact
match on its own task and 0% on the others, the base 0% everywhere. The same config gives
byte-identical files run to run (on CPU with the OpenBLAS kernels ``pipeline._blas`` pins, with 1 or
2 BLAS threads; other kernels change the last bits). Measured figures: ``docs/demo.md``.
"""

from pipeline.demo.build import build_demo
from pipeline.demo.config import DemoConfig, Progress
from pipeline.demo.pretrain import encode_pair, pretrain_base
from pipeline.demo.tasks import ALPHABETS, TASKS, Task, make_task_data, write_jsonl
from pipeline.demo.train import adapter_config, loss_to_eos, train_adapter

__all__ = ["ALPHABETS", "TASKS", "DemoConfig", "Progress", "Task", "adapter_config", "build_demo",
           "encode_pair", "loss_to_eos", "make_task_data", "pretrain_base", "train_adapter",
           "write_jsonl"]
