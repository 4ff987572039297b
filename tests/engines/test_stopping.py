from mlx_orchard.engines.stopping import StopStringFilter


def feed_all(stops, pieces):
    f = StopStringFilter(stops)
    out = "".join(f.feed(p) for p in pieces)
    return out + f.flush(), f.stopped


def test_stop_split_across_pieces_is_cut_and_never_leaks():
    f = StopStringFilter(["END"])
    assert f.feed("hello E") == "hello "  # "E" might start "END": held back
    assert f.feed("N") == ""
    assert f.feed("D and more") == ""
    assert f.stopped


def test_a_false_start_is_released():
    assert feed_all(["END"], ["say E", "Nough", "!"]) == ("say ENough!", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["b", "a"], ["xxab"]) == ("xx", True)


def test_no_stops_passes_everything_through():
    assert feed_all([], ["a", "b"]) == ("ab", False)


def test_held_text_is_flushed_at_the_end():
    assert feed_all(["STOP"], ["abc ST"]) == ("abc ST", False)
