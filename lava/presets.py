"""Published settings as presets: one flag (``--preset NAME``) reproduces a paper's reading.

A preset fills every option that decides a prediction. An option given on the command line
as well wins, and lava says which ones did (the run then no longer reproduces the paper's
setting exactly); the journal and report record the preset's name and every resolved value.
From Python a preset's values are split by where they go: ``segment_options()`` (the
``lava.options`` keywords of ``lava.segment``/``lava.config.recipe``), ``load_options()`` (the
keywords of ``lava.load_backend``) and ``eval_options()`` (``EvalSettings``' protocol and
background). Nothing here imports torch: the CLI parser lists the presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .options import OPTIONS

# Keywords of ``lava.load_backend`` a preset may set (how the model is loaded, not how it is read).
LOAD_OPTIONS = ("dtype", "drop_t5", "max_sequence_length", "offload_text_encoders")
# Fields of ``lava.evaluation.runner.EvalSettings`` a preset may set (which classes are named).
EVAL_OPTIONS = ("protocol", "background")


@dataclass(frozen=True)
class Preset:
    """``options``: command-line destinations (``args.<name>``) and the value the preset gives each
    (a callable is called when the preset is applied); an option a command does not have is
    skipped. ``grid``: options a sweep varies itself (its ``--timesteps``/``--layers``), not set
    there. ``sources``: where each value was read, for the docs and ``lava models``.
    ``differences``: what lava does not (or cannot) do identically.

    Every key of ``options`` is a ``lava.options`` name, a ``LOAD_OPTIONS`` or an
    ``EVAL_OPTIONS`` one (checked when the preset is made). From Python, without the CLI::

        from lava.presets import SEG4DIFF as p

        backend = lava.load_backend(p.model, **p.load_options())
        seg = lava.segment(img, classes, backend=backend, **p.segment_options())
        # lava eval's settings (lava.evaluation.runner.EvalSettings):
        settings = EvalSettings(**p.eval_options(), method=p.method, recipe=p.recipe(backend))

    Each returns a new dict (resolvers such as Seg4Diff's timestep called), so a value can be
    changed before use: ``{**p.segment_options(), "layers": [8, 9]}``.
    """

    name: str
    paper: str
    method: str
    model: str
    options: Mapping[str, object]
    sources: Mapping[str, str]
    grid: tuple[str, ...] = ("timestep", "layers")
    differences: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        unknown = [k for k in self.options if k not in OPTIONS and k not in LOAD_OPTIONS + EVAL_OPTIONS]
        if unknown:
            raise ValueError(
                f"preset {self.name}: unknown option(s) {', '.join(unknown)}; a preset sets lava.options "
                f"names, load options ({', '.join(LOAD_OPTIONS)}) or eval options ({', '.join(EVAL_OPTIONS)})"
            )

    def _values(self, names) -> dict[str, Any]:
        """The preset's values of ``names``, resolvers called (a list copied, so it may be changed)."""
        out = {}
        for key, value in self.options.items():
            if key in names:
                value = value() if callable(value) else value
                out[key] = list(value) if isinstance(value, list) else value
        return out

    def segment_options(self) -> dict[str, Any]:
        """The ``lava.options`` keywords of ``lava.segment``, ``segment_iter`` and
        ``lava.config.recipe`` (e.g. ``timestep``, ``layers``, ``normalize``)."""
        return self._values(OPTIONS)

    def load_options(self) -> dict[str, Any]:
        """The keywords of ``lava.load_backend`` (e.g. ``drop_t5``, ``max_sequence_length``,
        ``dtype``) for loading ``self.model``."""
        return self._values(LOAD_OPTIONS)

    def eval_options(self) -> dict[str, Any]:
        """``protocol`` and ``background`` of ``lava.evaluation.runner.EvalSettings``."""
        return self._values(EVAL_OPTIONS)

    def recipe(self, backend, **options: Any):
        """``lava.config.recipe(backend, ...)`` with the preset's options, ``options`` given here
        winning (e.g. ``layers=[1]`` on a smaller model)."""
        from .config import recipe

        return recipe(backend, **{**self.segment_options(), **options})


def seg4diff_timestep(num_steps: int = 28, index: int = -8, shift: float = 3.0) -> float:
    """The model timestep Seg4Diff reads SD3-medium at: ``timesteps[index]`` of a ``num_steps``-step
    ``FlowMatchEulerDiscreteScheduler`` with SD3-medium's ``shift`` (its scheduler_config.json),
    computed with diffusers' own scheduler: 515.072... (σ ≈ 0.515)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    return float(scheduler.timesteps[index])


_S4D = "cvlab-kaist/Seg4Diff"
SEG4DIFF = Preset(
    name="seg4diff",
    paper="Seg4Diff (Kim et al., NeurIPS 2025), open-vocabulary evaluation of SD3-medium",
    method="lava",
    model="sd3-medium",
    options=MappingProxyType(
        {
            "drop_t5": True,
            "max_sequence_length": 77,
            "dtype": "float16",
            "resolution": "1024x1024",
            "layers": [9],
            "timestep": seg4diff_timestep,  # a resolver: called when the preset is applied
            "direction": "image_to_text",
            "softmax": "joint",
            "source": "attention",
            "tokens": "clip",
            "normalize": "none",
            "min_presence": 0.0,
            "background_threshold": 0.0,
            "protocol": "present",
            "background": "none",
        }
    ),
    sources=MappingProxyType(
        {
            "drop_t5": f"{_S4D} sd3_backbone.py: from_pretrained(..., text_encoder_3=None)",
            "max_sequence_length": f"{_S4D} sd3_backbone.py: encode_prompt(..., max_sequence_length=77) "
            "-> 77 CLIP + 77 zero T5 positions = 154 text tokens",
            "dtype": f"{_S4D} configs/eval_ovss.yaml: BACKBONE.FP16 True (float16 weights, fp16 autocast)",
            "resolution": f"{_S4D} seg4diff_model_ovss.py: F.interpolate(images, size=(1024, 1024)) "
            "(stretched, aspect not kept)",
            "layers": f"{_S4D} configs/eval_ovss.yaml: ATTENTION_LAYERS [9] (0-based transformer_blocks)",
            "timestep": f"{_S4D} eval_ovss.yaml NUM_INFERENCE_STEPS 28, NOISE_STEPS 8; sd3_backbone.py "
            "scale_noise(latent, scheduler.timesteps[-8], noise); SD3-medium scheduler shift 3",
            "direction": f"{_S4D} attention_processor.py: attn_cache = scores[:, :, :4096, 4096:4096+77] "
            "(image queries, CLIP text keys)",
            "softmax": f"{_S4D} attention_processor.py: SOFTMAX True, SOFTMAX_I2T_ONLY False -> "
            "softmax over all joint keys",
            "heads": f"{_S4D} attention_processor.py: attn_scores.mean(dim=1) (KEEP_HEAD False)",
            "tokens": f"{_S4D} seg4diff_model_ovss.py: st = 1 (start token skipped), each class's "
            "num_tokens CLIP tokens averaged",
            "normalize": f"{_S4D} eval_ovss.yaml: NORM_BEFORE_MERGE False, NORM_AFTER_MERGE False "
            "(raw probabilities, argmax)",
            "protocol": f"{_S4D} eval_ovss.yaml: GT_ONLY_PROMPT True; seg4diff_model_ovss.py names only "
            "the classes in the image's ground truth, joined by spaces",
            "background": f"{_S4D} eval_ovss.sh: voc20, pc59 and coco_object without background; "
            "no threshold",
        }
    ),
    differences=(
        "resize: lava resizes with diffusers' VaeImageProcessor (PIL Lanczos on the uint8 image); "
        "Seg4Diff interpolates the [0, 1] tensor bilinearly",
        "noise: lava's is seeded (--seed, default 0); Seg4Diff draws it unseeded (BACKBONE.SEED None)",
        "attention arithmetic: Seg4Diff computes q·k and the softmax in fp16 under autocast; lava's "
        "slice kernels accumulate in float32 from the same fp16 q and k",
        "class names: lava prompts with its tables' prompt names (lava.evaluation.classnames: 'potted "
        "plant', 'dining table', 'tv monitor'); Seg4Diff's datasets/voc20.json keeps VOC's raw "
        "'pottedplant', 'diningtable', 'tvmonitor' (split at '-' only)",
        "COCO-Object: Seg4Diff's coco_2017_test_object_wo_bg ignores background pixels (ignore_label 0) "
        "but still names 'background' in the prompt when the ground truth holds some, and detectron2's "
        "mIoU then counts background (predicted, never scored) as a class with IoU 0; lava's nearest is "
        "--dataset coco_object80 (background neither named nor scored)",
    ),
)

PRESETS: Mapping[str, Preset] = MappingProxyType({SEG4DIFF.name: SEG4DIFF})
