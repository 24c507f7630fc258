"""``python -m idat_jax.checkpoints [NAME|URL|hf-hub:ORG/NAME]...``: lists the registered
pretrained checkpoints, or fetches each one given into the cache and prints its path (e.g.
ahead of a job on a host that runs offline). A module of its own so that ``-m`` does not run
``pretrained.py`` a second time after the package imported it."""

import logging
import sys

from idat_jax.checkpoints import pretrained

if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  sys.exit(pretrained.main())
