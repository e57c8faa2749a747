"""The default recipe of the `quantize` command and of the store's default model (issue 17), in a
module of its own so that the store reads it without importing the quantizer.

int4 at g = 32 with v in every layer and down in llama.cpp's `use_more_bits` layers stored int8 (with
the int8 embedding): llama.cpp Q4_K_M's class (on SmolLM2 2% smaller, within 0.8% of its WikiText-2
perplexity; BENCHMARKS.md "int8 linears chosen by measured KL"). quantize() itself keeps plain int4
at g = 128.
"""
RECIPE_GROUP_SIZE = 32
RECIPE_INT8 = "v@all,down@more"
