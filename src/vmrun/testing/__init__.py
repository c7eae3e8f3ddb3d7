"""Testing with vmrun: the pytest plugin's fixtures and the runs of a suite inside a VM."""
