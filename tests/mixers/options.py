"""Options that make every mixer's structure show at test lengths (the suites' sequences are 5–20
tokens): a FLASH chunk of 3 (several chunks, the last one partial), an AFT-local window of 2 (positions
outside it, and a decoding window that slides) and an AFT-conv kernel of 3, so that chunks, packed
segments and steps cross them."""

SMALL_OPTIONS = {"flash": {"chunk_size": 3}, "aft_local": {"window": 2}, "aft_conv": {"kernel_size": 3}}
