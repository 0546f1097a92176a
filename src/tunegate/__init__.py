"""tunegate: benchmark-first, gated LLM fine-tuning.

Data in, eval-gated adapter out. ``import tunegate`` is cheap: torch, transformers and friends are
imported inside the functions that need them.
"""

__version__ = "0.1.0"

# Exit codes of the CLI, documented in the README and `tunegate --help`.
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure (a bug, or the machine ran out of something)
EXIT_INVALID_INPUT = 2  # bad config, bad data, missing file, changed golden set: nothing was trained
EXIT_GATE_FAILED = 3  # the pipeline ran, and the eval gate said FAIL: the adapter is not promoted
EXIT_AUDIT_NO_TRAIN = 4  # the audit measured that training does not pay; `run` stopped before training
EXIT_DRIFT = 5  # `tunegate drift`: production traces (or the served adapter's golden score) crossed a drift threshold


class TunegateError(Exception):
    """An error in the user's input (config, data, golden set) with a one-line message.

    The message names the file, the line or key, and the rule that was broken.
    """

    exit_code = EXIT_INVALID_INPUT
