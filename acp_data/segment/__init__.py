"""Box-prompted segmenters (``sam``). Registered in ``acp_data.registry``."""
