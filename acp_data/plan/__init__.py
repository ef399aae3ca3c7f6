"""Scene planners (``prior``, ``hf``, ``openai``): work unit -> SceneGraph. Registered in ``acp_data.registry``."""
