"""labkit: the code behind the fine-tuning course notebooks."""

import logging
import warnings

__version__ = "0.1.0"

# Three third-party messages that every clean run prints as a pink stderr block in the notebooks and
# that a learner can do nothing about. Each is silenced by its exact text, where it is emitted; all
# other warnings still show.
# 1. bitsandbytes >= 0.50 on a CPU with AVX512-BF16 tries an optional faster 4-bit kernel from the
#    `kernels` package when imported (bitsandbytes/backends/cpu/ops.py) and logs this when it is not
#    installed; it then uses its built-in CPU kernel, which is what labkit.quant is checked against.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
)
# 2. transformers after 5.0 (5.23 here) renamed `is_gradient_checkpointing` to `is_activation_checkpointing`;
#    peft's get_peft_model still reads the old name (peft_model.py), so every LoRA model triggers the warning.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")
# 3. ... and renamed TrainingArguments' `gradient_checkpointing` to `activation_checkpointing`; TRL's
#    configs (SFTConfig, DPOConfig) still set the old one by default, so every TRL config triggers it.
#    labkit keeps the old name because its lower bound (transformers 5.6) has only that one.
warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.training_args")


class LabkitError(Exception):
    """An error with a short, actionable message; shown without a traceback in notebooks."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing the full traceback.
        return [f"{type(self).__name__}: {self}"]
