"""The test and demo PACS -- not production code, and no real PACS.

- :mod:`dqr.plugins.testpacs.memory`: the ``memory`` backend, an in-memory
  PACS loaded from a folder or generated as a synthetic cohort (the embedded
  default of the demo), and ``dqr demo-data``;
- :mod:`dqr.plugins.testpacs.mockpacs`: ``dqr mock-pacs``, that PACS served
  over real DIMSE and HTTP with fault injection (hostile content included),
  plus a Storage SCP and a STOW-RS server to send to.

The plugins that talk to real PACSes are :mod:`dqr.plugins.dimse`,
:mod:`dqr.plugins.dicomweb` and :mod:`dqr.plugins.destinations`.
"""
