"""How the NoRA branch and its neighbours are computed: the stacked mixed-adapter pass (``mixed``), the grouped-query
decode attention (``attention``) and what the hardware does fast (``device``). Torch only at import time."""
