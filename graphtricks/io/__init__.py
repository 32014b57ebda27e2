"""What comes in and goes out: model specs, example inputs, recipes, saved folders.

``specs`` loads a model from a spec (``tv:resnet18``, ``path.py:Name``); ``inputs`` parses
input shapes and makes seeded example inputs; ``recipe`` reads and writes the TOML pass list;
``folder`` saves a rewritten model as a folder and rebuilds it (``gt.save`` / ``gt.load``).
"""
