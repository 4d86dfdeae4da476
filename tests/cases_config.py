"""Bad options: PruneConfig refuses them before anything touches the model."""
from bad_input_table import Case

from loraprune.config import PruneConfig


def _cfg(**kw):
    return lambda tmp_path: PruneConfig(**kw)


CASES = [
    Case("config-ratio-zero", _cfg(ratio=0.0), r"ratio must be > 0"),
    Case("config-ratio-one", _cfg(ratio=1.0), r"ratio must be < 1"),
    Case("config-ratio-string", _cfg(ratio="0.5"), r"ratio must be a finite number"),
    Case("config-ratio-nan", _cfg(ratio=float("nan")), r"ratio must be a finite number"),
    Case("config-steps-zero", _cfg(steps=0), r"steps must be >= 1"),
    Case("config-steps-float", _cfg(steps=10.5), r"steps must be an integer"),
    Case("config-lr-negative", _cfg(lr=-1e-4), r"lr must be > 0"),
    Case("config-lora-r-zero", _cfg(lora_r=0), r"lora_r must be >= 1"),
    Case("config-dropout-one", _cfg(lora_dropout=1.0), r"lora_dropout must be < 1"),
    Case("config-criterion-typo", _cfg(criterion="loar"), r"criterion must be one of 'lora'"),
    Case("config-normalize-unknown", _cfg(normalize="sum"), r"normalize must be one of"),
    Case("config-ema-one", _cfg(ema=1.0), r"ema must be < 1"),
    Case("config-ranking-unknown", _cfg(ranking="best"), r"ranking must be one of"),
    Case("config-round-to-zero", _cfg(round_to=0), r"round_to must be >= 1"),
    Case("config-batch-size-zero", _cfg(batch_size=0), r"batch_size must be >= 1"),
    Case("config-grad-accum-zero", _cfg(grad_accum=0), r"grad_accum must be >= 1"),
    Case("config-distill-above-one", _cfg(distill=1.5), r"distill must be <= 1"),
    Case("config-lr-schedule-unknown", _cfg(lr_schedule="step"), r"lr_schedule must be one of"),
    Case("config-square-not-bool", _cfg(square="yes"), r"square must be True or False"),
    Case("config-resume-without-dir", _cfg(resume=True), r"resume=True needs checkpoint_dir"),
    Case("config-uniform-with-skips", _cfg(uniform=True, skip_layers=[0]), r"uniform=True needs every layer"),
    Case("config-uniform-with-global", _cfg(uniform=True, ranking="global"), r"uniform=True needs every layer"),
    Case("config-unknown-option", lambda p: PruneConfig.from_kwargs(ratoi=0.3), r"did you mean 'ratio'"),
    Case("config-not-a-config", lambda p: PruneConfig.from_kwargs({"ratio": 0.3}), r"must be a loraprune.PruneConfig",
         raises=TypeError),
]
