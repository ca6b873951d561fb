"""train: mid-train SmolLM3 on the packed shards of `prep build`. Run `python -m train --help`."""
