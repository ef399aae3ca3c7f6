"""Box-prompted segmenters (image + absolute XYXY boxes -> one boolean mask per box), registered in
``acp_data.registry.SEGMENTERS``: ``sam`` (``acp_data.segment.sam.SamSegmenter``, transformers' SAM, any size)."""
