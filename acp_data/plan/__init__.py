"""Scene planners (work unit -> SceneGraph), registered in ``acp_data.registry.PLANNERS``: ``prior`` (no model:
sizes and real box pairs from the priors), ``hf`` (a transformers causal LM) and ``openai`` (any OpenAI-compatible
endpoint); the two LLM planners share the paper's two-stage prompts (``prompts``), the robust answer parser
(``parse``) and the retry-with-feedback loop (``llm.ChatPlanner``)."""
