"""Paper-independent pieces shared by dshmp.py, dmvs.py, vatex.py and mracl.py."""
