"""Attribution-based sparse activation for small language models: the library behind the scripts."""
