"""Stage tests: the contract every registered stage keeps, and adding a stage."""
