"""Options that make every mixer's structure show at test lengths: a FLASH chunk, an AFT-local window
and an AFT-conv kernel a few tokens long, so that chunks, packed segments and steps cross them."""

SMALL_OPTIONS = {"flash": {"chunk_size": 3}, "aft_local": {"window": 2}, "aft_conv": {"kernel_size": 3}}
