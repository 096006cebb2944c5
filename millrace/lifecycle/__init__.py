"""A batch's life, as pure decisions (no I/O): the status machine (`status`), the state the
aggregator keeps and what each event does to it (`state`), and what moves a batch that a
fault left behind (`decisions`). Every rule is tested directly."""
