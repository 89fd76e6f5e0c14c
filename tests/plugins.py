"""Plug-ins used by tests through import paths, as users would write them."""


def exploding_reward(sample):
    raise RuntimeError("reward exploded")
