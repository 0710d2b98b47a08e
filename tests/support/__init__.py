"""Test machinery shared by tunefleet's test modules, such as the loopback sshd hosts."""
