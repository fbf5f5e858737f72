"""The error every layer above the data raises for the user: a model, run folder or option combination that cannot
be used. str(e) is the one line the CLIs print before exiting with status 2. (Bad data raises dataset.DataError.)"""


class ModelError(Exception):
    """A model, checkpoint or run that cannot be found or used: one line for the user."""


class RewardError(Exception):
    """A GRPO reward function that crashed or returned something other than one number (or None) per completion:
    one line naming the reward and the sample."""
