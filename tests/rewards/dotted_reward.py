"""A reward defined outside the package, for the registry's dotted-path lookup (tests/rewards/test_registry.py)."""


def brevity(completions, **kwargs):
    """1 / (1 + number of characters): shorter is better."""
    return [1.0 / (1 + len(text)) for text in completions]


NOT_A_FUNCTION = 3
