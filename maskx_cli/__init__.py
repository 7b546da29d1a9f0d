"""The ``maskx`` command line: parse, call a pipeline function, print. No model logic here."""
