"""acp-data: generated, CLIS-scored synthetic training data for long-tail instance segmentation with detectron2.

Importing the package is cheap: torch, detectron2 and the generation libraries are imported by the modules that
need them.
"""

__version__ = "0.1.0"
