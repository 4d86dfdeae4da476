"""Bad devices, dtypes and gradient-checkpointing options: refused before any model is loaded."""
import loraprune
from bad_input_table import Case
from cases_io import _eval, _prune
from loraprune.config import PruneConfig
from tiny import random_batches, tiny_model


def _no_checkpointing_support(tmp_path):
    model = tiny_model()
    model.supports_gradient_checkpointing = False
    loraprune.prune(model, random_batches(n=1), ratio=0.5, steps=2, gradient_checkpointing=True, progress=False)


CASES = [
    Case("cli-device-unknown", _prune("--device", "tpu"), r"--device tpu: pass cpu, cuda, cuda:N or auto"),
    Case("cli-device-bad-index", _prune("--device", "cuda:one"), r"--device cuda:one: pass cpu, cuda, cuda:N or auto"),
    # no GPU here: "no CUDA GPU is visible ... pass --device cpu"; on a GPU machine: "only N CUDA device(s)"
    Case("cli-device-gpu-missing", _prune("--device", "cuda:99"),
         r"--device cuda:99: (no CUDA GPU is visible .*pass --device cpu|only \d+ CUDA device)"),
    Case("cli-dtype-unknown", _prune("--dtype", "float64"), r"argument --dtype: invalid choice: 'float64'"),
    Case("cli-eval-device-unknown", _eval("--model", lambda p: p["model"], "--data", lambda p: p["data"],
                                          "--device", "gpu"), r"--device gpu: pass cpu, cuda, cuda:N or auto"),
    Case("cli-gradient-checkpointing-value", _prune("--gradient-checkpointing", "yes"),
         r"unrecognized arguments: yes"),
    Case("config-gradient-checkpointing-not-bool", lambda p: PruneConfig(gradient_checkpointing="yes"),
         r"gradient_checkpointing must be True or False"),
    Case("api-gradient-checkpointing-unsupported", _no_checkpointing_support,
         r"does not support gradient checkpointing; drop gradient_checkpointing=True"),
]
