"""Layout-to-image generators (``gligen``, plug-ins by import path). Registered in ``acp_data.registry``."""
