"""labkit: the code behind the fine-tuning course notebooks."""

__version__ = "0.1.0"


class LabkitError(Exception):
    """An error with a short, actionable message; shown without a traceback in notebooks."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing the full traceback.
        return [f"{type(self).__name__}: {self}"]
