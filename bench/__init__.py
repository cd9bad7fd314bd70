"""Tools that measure: the loss kernels, the data path, the Llama encoder, and training memory."""
