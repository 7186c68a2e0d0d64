from pdtui.app.widgets.detail import RequestDetail
from pdtui.app.widgets.header import PairHeader
from pdtui.app.widgets.histograms import LatencyHistogram
from pdtui.app.widgets.instance_pane import InstancePane
from pdtui.app.widgets.transfers import TransfersTable

__all__ = ["InstancePane", "LatencyHistogram", "PairHeader", "RequestDetail", "TransfersTable"]
