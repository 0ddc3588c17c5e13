"""vLLM-side layers of the quamba plugin: the quantized Mamba2 mixer and the model classes.

Everything here imports vLLM; import the submodules explicitly
(``vllm_quamba.layers.models``, ``vllm_quamba.layers.mamba2_mixer``).
"""
