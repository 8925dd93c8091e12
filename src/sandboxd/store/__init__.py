"""sandboxd.store"""
