"""Where the NoRA branch and its neighbours are computed (the kernel seam; vLLM's punica wrapper + selector).

* ``activations`` -- the one table of activations (name -> forward, backward, Triton id; act(0) = 0 checked);
* ``reference`` -- the torch backend: the training autograd function, the inference fast path (``add_``) and the
  gathered mixed pass (``mixed_add_``, ``segmented_add_``);
* ``triton`` -- the Triton backend: the same inference entry points as one fused launch (imported only when chosen);
* ``select`` -- which backend for a device / dtype / availability (``$NORA_KERNELS`` forces one);
* ``mixed`` -- stacked adapters, rank buckets and per-step segments for mixed batches;
* ``decode`` -- greedy decode with a static KV cache (the step captured as a CUDA graph on CUDA);
* ``attention`` (grouped-query decode attention) and ``device`` (what the hardware does fast).

Torch only at import time.
"""
