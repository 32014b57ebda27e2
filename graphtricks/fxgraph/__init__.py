"""Helpers on fx graphs, shared by capture, the passes and export; they know no pass.

``kinds``: what a module or call is (dropout, norms, containers, views), one table per concept;
``activations``: nonlinearities in every form fx records; ``nodes``: names, module stacks,
insertion; ``dataflow``: which nonlinearity each value reaches, residual branches;
``fastpath``: a faster forward for the graphs a rewrite returns.
"""
