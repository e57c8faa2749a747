"""The default recipe of the `quantize` command and of the store's default model (issue 17), in a
module of its own so that the store reads it without importing the quantizer.

AWQ int4 at g = 32 for q and the middle layers' o; 6-bit (q6, formats/q4.py) for k, v, gate, up, down
in every layer and o in the first and last eighth; the tied embedding stored once as q6 with a scale
per 64 values and used as the head. Chosen on WikiText-2 validation and C4 only: on SmolLM2-135M the
folder is smaller than llama.cpp's Q4_K_M file and better on WikiText-2 and tiny-Shakespeare test at
ctx 512 and 2048 (BENCHMARKS.md "q6 …", "The default recipe becomes q6"). quantize() itself keeps
plain int4 at g = 128.
"""
RECIPE_GROUP_SIZE = 32
RECIPE_INT8 = None
RECIPE_INT6 = "v@all,k@all,o@ends,gate@all,up@all,down@all"
RECIPE_EMBED = "q6"
RECIPE_EMBED_GROUP_SIZE = 64
