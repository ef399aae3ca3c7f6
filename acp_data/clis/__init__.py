"""CLIS: layout score (CLIS-L), image scores (CLIS-I) and the cherry-picking rules."""
