"""`rayscale tune`: search spaces (space.py), the search over the driver's own trainer (search.py), ASHA's
schedulers (asha.py) and ASHA by promotion's bookkeeping (promotion.py)."""
