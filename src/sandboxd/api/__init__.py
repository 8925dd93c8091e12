"""sandboxd.api"""
