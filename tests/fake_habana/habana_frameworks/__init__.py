"""A test double of Intel Gaudi's PyTorch bridge: the kernels DLRM calls, on the CPU, recording their calls.

Only the tests import it (they put ``tests/fake_habana`` on ``sys.path``). The semantics follow
``shared/reference/habana_port_notes.md`` §4, written independently of torch's embedding kernels.
"""
