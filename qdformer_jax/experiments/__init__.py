"""Experiments that train several runs and tabulate them (Table 2 / Fig. 7 on the synthetic task)."""
