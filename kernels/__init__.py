"""Triton kernels for weight-sparse training (docs/method.md §4), each wrapped as a torch custom op.

- `abstopk`:  fused per-token top-|x| (activation sparsity), forward and backward.
- `compress`: compressed copies of a sparse weight (CSR by output rows and by input rows), built on the GPU.
- `spmm`:     SpMM over those copies for Y = X·Wᵀ and dX = dY·W; dW stays a dense matmul.
- `select`:   radix select of the k largest |w| with the reference tie rule and the j-per-neuron protection.
- `crossover`: the density below which SpMM beats dense for a matrix shape, measured on the GPU at hand.

The benchmarks live in sparse_lm/bench (`python -m sparse_lm.bench`); this package imports nothing from sparse_lm.

Kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before this package is imported
(that is how the tests run them without a GPU).
"""
