"""Who a client is and what it may do: users (htpasswd), tokens the mirror issues,
access rules, and rate limits. Nothing here knows HTTP routing or Starlette; the web
layer (``web/auth.py``) asks these parts and turns their answers into responses."""
