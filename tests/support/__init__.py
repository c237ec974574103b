"""What the tests share: real peers, mesh folders, the CLI, Chromium, network namespaces.

``tests/conftest.py`` holds only the fixtures; they start and stop what these modules
define, so a test can also use the classes directly (``from support.peers import Peers``).
"""
